"""Ray job: USLoRA fine-tuning on Ray Train.

    ray job submit --working-dir . -- python jobs/finetune.py --config paper run_dir=s3://bucket/run
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("finetune", sys.argv[1:]))
