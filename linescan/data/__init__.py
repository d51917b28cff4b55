"""Image I/O, dataset layouts (MVTec-AD, plain folders) and synthetic webs for tests and demos."""
