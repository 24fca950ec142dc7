"""The processes of the architectural floor (bench/floor.py): one module, one role per
process (``python -m bench.floor_parts <role> ...``). Each is the least a Sluice
process on that step of the path has to do with the same libraries (granian's embedded
ASGI server with a raw ASGI app, nats-py, uvloop, an aiohttp client), and nothing more:
no framework, validation, tokenizer, tracing, admission or cache."""
