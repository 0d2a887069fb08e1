from st_npu.cli import main

raise SystemExit(main())
