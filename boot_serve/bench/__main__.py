"""`python -m boot_serve.bench`: the served benchmark, or with --in-process the in-process one
(boot_serve.bench.inprocess: BootPipeline on a device, e.g. CUDA with CUDA graphs)."""

import sys

if "--in-process" in sys.argv[1:]:
    from boot_serve.bench.inprocess import main
else:
    from boot_serve.bench import main

sys.exit(main())
