"""Optional integrations with other libraries (imported only when installed)."""
