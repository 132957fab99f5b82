"""A real Django project in one module, served unchanged by doordown in the tests."""

from django.conf import settings

import os  # noqa: E402

# The admin is installed for its static files: `collectstatic` gathers them into
# DOORDOWN_STATIC_ROOT, which the tests serve with `--static-map /static=...`.
settings.configure(DEBUG=False, SECRET_KEY="doordown-tests", ROOT_URLCONF=__name__,
                   ALLOWED_HOSTS=["*"], MIDDLEWARE=[], USE_TZ=True,
                   INSTALLED_APPS=["django.contrib.admin", "django.contrib.auth",
                                   "django.contrib.contenttypes", "django.contrib.staticfiles"],
                   STATIC_URL="/static/",
                   STATIC_ROOT=os.environ.get("DOORDOWN_STATIC_ROOT", "static-root"))

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.urls import re_path  # noqa: E402


def echo(request):
    return JsonResponse({"path": request.path, "method": request.method,
                         "query": request.GET.dict(), "body": request.body.decode()})


urlpatterns = [re_path(r"^.*$", echo)]
application = get_wsgi_application()
