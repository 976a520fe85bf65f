import sys

from rm_scale.cli import main

sys.exit(main())
