"""tapeflow dataflows: feeds -> validation -> bars -> store (no Panel/Bokeh imports here)."""
