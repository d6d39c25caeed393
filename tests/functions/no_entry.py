def something_else(event, context):
    return "not an entry point"
