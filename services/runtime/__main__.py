"""Entry point of an instance: python -m services.runtime <instance-config.json>."""

import sys

from services.runtime.loop import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
