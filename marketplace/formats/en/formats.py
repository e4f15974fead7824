"""The console's date and time formats (settings.FORMAT_MODULE_PATH): times to the second with
the zone, so an operator reading a list or a page knows exactly when, and in which zone."""

DATETIME_FORMAT = "Y-m-d H:i:s T"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s T"
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i:s"
