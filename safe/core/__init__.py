"""The shared runtime every other layer may import: errors, atomic files, caches, disk space, threads, settings."""
