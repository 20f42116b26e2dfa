"""Lightning callbacks; ReparamCallback converts the trained model to its deploy form."""
