"use strict";
// The room's lesson reports as the panel and the report page list them (GET /api/reports
// rows: lesson, start, minutes and the attendance counts, corrections applied).

function reportLine(row) {
  const start = I18N.dateTime({ dateStyle: "medium", timeStyle: "short" }).format(new Date(row.start * 1000));
  const attended = row.present + row.late + row.left_early;
  return I18N.t("common.report_item", {
    start: start,
    minutes: I18N.number(row.minutes),
    attended: I18N.number(attended),
    total: I18N.number(attended + row.absent),
  });
}

function reportLink(lesson, token) {
  const fragment = new URLSearchParams({ lesson: lesson });
  if (token) fragment.set("token", token);
  return "/report#" + fragment.toString();
}
