"""Static files of the pages (CSS, JS, icons), shipped inside the package as muse.static."""
