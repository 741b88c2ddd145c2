# placeholder, replaced by the helper that owns it
