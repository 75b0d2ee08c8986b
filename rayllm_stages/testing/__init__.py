"""Builders and fixtures for tests, demos and benchmarks (as Prefect ships `prefect.testing`): tiny text
and vision models, a local S3 server, an image corpus, a fault-injecting S3 proxy, a client load.
Nothing in the runtime layers imports this package.
"""
