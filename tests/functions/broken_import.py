import no_such_module_for_hourai_tests  # noqa: F401


def handler(event, context):
    return "never"
