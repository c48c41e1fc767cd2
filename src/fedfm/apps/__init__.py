"""Entry points that deployment runtimes start (Flower's ServerApp and ClientApp)."""
