from meddap.cli import main

raise SystemExit(main())
