"""``python -m simulators``: the fleet runner without the ``iotfleet`` CLI."""

from simulators.cli import main

if __name__ == "__main__":
    main()
