"use strict";
// The pages' one message lookup, shared by the panel, the kiosk, the watch page and the
// dashboard. The server inlines the catalogues and the ui.language setting into the page
// (<script type="application/json" id="i18n-data">); "auto" follows navigator.languages.
// A key missing from the chosen catalogue shows the English text and is reported (a
// console error and <html data-i18n-missing="...">), so the browser tests fail on it.
//
//   I18N.t("panel.lesson_started", { id: "abc" })   text with {placeholders} filled in
//   I18N.tn("dash.school.rooms", 3)                 the plural form for 3 ({n} is set)
//   data-i18n="key" (text), data-i18n-placeholder, data-i18n-title, data-i18n-aria-label

const I18N = (() => {
  const data = JSON.parse(document.getElementById("i18n-data").textContent);
  const catalogues = data.catalogues;
  const has = (object, key) => Object.prototype.hasOwnProperty.call(object, key);

  function choose(setting, languages) {
    if (has(catalogues, setting)) return setting;
    // auto: the first of the browser's languages we have (zh-TW, zh-HK read zh-CN
    // better than English), else the fallback.
    for (const wanted of languages) {
      const lower = String(wanted).toLowerCase();
      for (const lang of Object.keys(catalogues)) {
        if (lower === lang.toLowerCase() || lower.split("-")[0] === lang.toLowerCase().split("-")[0]) {
          return lang;
        }
      }
    }
    return data.fallback;
  }

  const lang = choose(data.setting, navigator.languages || [navigator.language || ""]);
  const messages = catalogues[lang];
  const fallback = catalogues[data.fallback] || {};
  const missing = [];

  function report(what) {
    if (missing.includes(what)) return;
    missing.push(what);
    document.documentElement.dataset.i18nMissing = missing.join(" ");
    console.error("i18n: no text for " + what + " in " + lang);
  }

  function format(key, text, params) {
    return text.replace(/\{(\w+)\}/g, (whole, name) => {
      if (params && has(params, name)) return String(params[name]);
      report(key + "{" + name + "}");
      return whole;
    });
  }

  function t(key, params) {
    if (has(messages, key)) return format(key, messages[key], params);
    report(key);
    return has(fallback, key) ? format(key, fallback[key], params) : key;
  }

  const plurals = new Intl.PluralRules(lang);
  function tn(key, n, params) {
    const form = key + "." + plurals.select(n);
    const all = Object.assign({ n: number(n) }, params || {});
    return t(has(messages, form) ? form : key + ".other", all);
  }

  const numberFormats = new Map();
  function number(value, digits) {
    // Formatters are built once per precision: the dashboard formats hundreds of rows.
    const d = digits === undefined ? 0 : digits;
    let format = numberFormats.get(d);
    if (!format) {
      format = new Intl.NumberFormat(lang, { minimumFractionDigits: d, maximumFractionDigits: d });
      numberFormats.set(d, format);
    }
    return format.format(value);
  }

  function dateTime(options) {
    return new Intl.DateTimeFormat(lang, options);
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return t("common.duration.seconds", { s: number(s) });
    const m = Math.floor(s / 60);
    if (m < 60) return t("common.duration.minutes", { m: number(m) });
    const h = Math.floor(m / 60);
    if (h < 48) return t("common.duration.hours", { h: number(h), m: number(m % 60) });
    return t("common.duration.days", { d: number(Math.floor(h / 24)), h: number(h % 24) });
  }

  const ATTRIBUTES = { i18nPlaceholder: "placeholder", i18nTitle: "title", i18nAriaLabel: "aria-label" };
  function translate(root) {
    for (const node of root.querySelectorAll("[data-i18n], [data-i18n-placeholder], [data-i18n-title], [data-i18n-aria-label]")) {
      if (node.dataset.i18n) node.textContent = t(node.dataset.i18n);
      for (const [field, attribute] of Object.entries(ATTRIBUTES)) {
        if (node.dataset[field]) node.setAttribute(attribute, t(node.dataset[field]));
      }
    }
    for (const template of root.querySelectorAll("template")) translate(template.content);
  }

  document.documentElement.lang = lang;
  document.documentElement.dataset.lang = lang;
  // Deferred scripts run once the document is parsed: the page's own script, listed
  // after this one, finds its static text already translated.
  translate(document);
  return { lang, t, tn, number, dateTime, duration, translate, missing };
})();
