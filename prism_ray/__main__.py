import sys

from prism_ray.cli import main

sys.exit(main())
