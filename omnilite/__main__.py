from omnilite.cli import main

raise SystemExit(main())
