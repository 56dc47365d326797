"""The page `llmk serve` answers at GET / (page.py renders it from the HTML, JS and CSS files here)."""
