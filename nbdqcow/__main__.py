import sys

from nbdqcow.cli import main

sys.exit(main())
