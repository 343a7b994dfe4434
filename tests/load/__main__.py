import sys

from tests.load.main import main

sys.exit(main())
