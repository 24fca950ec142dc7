"""``sluice up``: the whole product on one machine, supervised.

Starts, in order: an embedded NATS server with JetStream (unless ``SLUICE_NATS_URL``
names one), the local model on llama.cpp's ``llama-server`` (unless ``--no-model`` or
``SLUICE_LLAMA_URL``), optionally the simulated provider (``--simulator``), and the five
services as child processes. The cache keeps its entries in JetStream KV, so there is no
Qdrant or other store process to start. Once every service answers ready on its NATS health
subject it prints where to point a client, then watches the children: if one dies, it
says which and shows the end of its log, stops the rest and exits non-zero. Ctrl-C or
SIGTERM stops everything in reverse order: SIGTERM to the services, wait for their
graceful shutdown, then the simulator, the model server and NATS.

One module per responsibility:

- ``plan``: what to start, on which ports and with which environment, and the checks
  that can fail before anything starts (a port taken or configured twice, a bad number);
- ``supervisor``: the processes: start, readiness, watching, ordered stop with the
  services' graceful drain;
- ``ready``: the readiness probe, a short-lived process of its own (the NATS client
  never loads in the supervisor, which runs as long as the product);
- ``console``: every line ``sluice up`` prints;
- ``command``: the options and the entry point.
"""
