"""Prefect tasks of the save-adapter pipeline: thin wrappers, one step per module, each calling the core
(`adapterflow`) and returning small serializable results (paths and metadata), never tensors or models."""
