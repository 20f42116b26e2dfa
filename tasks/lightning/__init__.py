"""The command line and the Lightning adapters: TaskCLI, checkpoint I/O, the CSV logger, RNG state."""
