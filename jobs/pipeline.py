"""Ray job: the whole study (prepare -> finetune -> generate -> fid -> sweep -> report), skipping done stages.

    ray job submit --working-dir . -- python jobs/pipeline.py --config paper run_dir=s3://bucket/run
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("pipeline", sys.argv[1:]))
