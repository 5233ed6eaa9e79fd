"""`python -m bench`: environment, suites, plots and the regression gate."""
