"""`vmoe serve`: an HTTP inference server for a saved model, with compute
budgets chosen per request (`serve.app`)."""
