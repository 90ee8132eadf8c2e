"""raFLoRA aggregation server: the aggregation engine lives in :mod:`raflora.server.engine`."""
