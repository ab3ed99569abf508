from embedd.cli import main

raise SystemExit(main())
