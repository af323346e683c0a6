"""Ray job: synthetic images on Ray Data.

    ray job submit --working-dir . -- python jobs/generate.py --config paper run_dir=s3://bucket/run
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("generate", sys.argv[1:]))
