"""Prices are per GPU-hour in the marketplace's unit of account (USD-like, 6 decimals): the
precision every app's models and API fields share."""

PRICE_MAX_DIGITS = 12
PRICE_DECIMALS = 6
