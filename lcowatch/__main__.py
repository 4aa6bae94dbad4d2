from lcowatch.cli import main

raise SystemExit(main())
