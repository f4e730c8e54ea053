import sys

from boot_serve.export import main

sys.exit(main())
