"""The surfaces (CLI; later the UI and the HTTP API) and the settings behind them."""
