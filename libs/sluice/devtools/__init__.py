"""Development tools that run beside the services: ``sluice up`` (the launcher), the
simulated provider, ``sluice trace``, the local model and the embedded NATS server.

The runtime in ``sluice`` is what services import; nothing there or in a service imports
this package (``tests/contracts/test_layout.py`` checks), so the tools can change without
touching what the services run on.
"""
