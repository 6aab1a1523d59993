"""emgd.drivers: the device layer (wire protocol, transports, simulated and replay bands).

Nothing here imports the pipeline, decoders, publisher or CLI (see tests/test_architecture.py).
"""
