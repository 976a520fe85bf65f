import sys

from rm_scale.commands.cli import main

sys.exit(main())
