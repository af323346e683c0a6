"""Ray job: tables, figures and report.md.

    ray job submit --working-dir . -- python jobs/report.py --config paper run_dir=s3://bucket/run
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("report", sys.argv[1:]))
