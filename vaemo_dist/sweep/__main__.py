import sys

from vaemo_dist.sweep.cli import main

sys.exit(main())
