"""The one owner of what an export or engine folder is: manifests, weight layout, atomic writes, op names."""
