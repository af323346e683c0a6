"""Ray job: the classifier grid on Ray Tune.

    ray job submit --working-dir . -- python jobs/sweep.py --config paper run_dir=s3://bucket/run
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("sweep", sys.argv[1:]))
