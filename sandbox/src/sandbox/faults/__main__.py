"""``python -m sandbox.faults``: run the fault proxy (arguments: see ``proxy.main``)."""

from sandbox.faults.proxy import main

main()
