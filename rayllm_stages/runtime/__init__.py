"""One Ray per process (`cluster`: connect, start locally, reap clusters left by dead drivers) and Ray
worker output forwarded to a log (`worker_logs`).
"""
