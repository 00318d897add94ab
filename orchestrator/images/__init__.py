"""Container images: references as Docker parses them."""
