from hourai.cli import main

raise SystemExit(main())
