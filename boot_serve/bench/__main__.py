"""`python -m boot_serve.bench` (the console script boot-bench): the served benchmark, or with --in-process
the in-process one (boot_serve.bench.inprocess: BootPipeline on a device, e.g. CUDA with CUDA graphs)."""

import sys

from boot_serve.bench import main

sys.exit(main())
