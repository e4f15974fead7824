"""The operator console driven in a real headless browser (Chromium through Selenium)."""
