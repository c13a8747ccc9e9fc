"""``python -m grads_ray ...`` is ``grads-ray ...`` (no reliance on console scripts being on PATH)."""

import sys

from grads_ray.cli import main

sys.exit(main())
