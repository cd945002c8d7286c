"""Scene readers, generated demo scenes and view sampling."""
